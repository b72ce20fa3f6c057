"""A node's maintenance sessions (refresh, reshare, the first MAC key), one concern per module.

``sessions`` the session model (constants, ``Plan``, load/open, the enrolment
guards, seal bindings) and its state machine (begin, commit, finalize, abort);
``peers`` the node-to-node client (``Peers``, pinning, how far members got);
``prepare`` the receiving side of prepare (new rows written, sealed, checked
later); ``dealing`` what a node deals to its peers (deltas, reshare values,
check masks, tag renewal values); ``checks`` the refresh, reshare and renewal
checks; ``mac_keys`` the epoch MAC key (first dealing, refresh's new key,
reshare of the key). ``shareholders.epochs`` is the servicer that joins them.

Each module holds one step class; ``MaintenanceService`` inherits them all,
so they share one node context: ``self.node`` (the node's
``ShareholderService``: ``reader()``, ``commit(job)``, ``keys``, ``writer``,
the MAC key seals, ``serve_epoch``), ``self.peers`` and the session caches
that ``MaintenanceService.__init__`` sets up.
"""
