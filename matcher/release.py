"""One Verify's hedged release of shares, as an explicit object (also
Identify's confirmation of a candidate, under the query's IDENTIFY ticket).

``Release.run`` asks k nodes first, so a verification releases only the
shares it needs; the other nodes are asked as soon as one of the first fails
or sends an unusable share, the shares in hand do not rejoin, or
``hedge_ms`` passes without k shares. Every answer is parsed once at this
edge (``vaultrpc.wire``) into a validated ``record.Share`` and
``record.KeyShare``; the rejoin (``record.join``) never checks them again.

The state is the object's attributes: the shares in hand per epoch, the
failures, the subsets tried, whether a rejoin failed its integrity check,
and the nodes not asked yet. Lying nodes are named in one place
(``_name_suspects``): the shares ``record.join`` outvoted and, through
``record.off_polynomial``, the shares that arrived after the decision.
"""
from __future__ import annotations

import logging
import time
import zlib
from collections import Counter as Tally
from collections.abc import Callable

import grpc

from matcher.committee import TRANSPORT_CODES, Outcome
from matcher.config import ShareholderEndpoint
from splitvault.v1 import shareholder_pb2
from vault import epoch_mac, record
from vault.errors import IntegrityError, InvalidShares
from vaultrpc import logs, status, wire

# Node answers that settle a verification without k shares, in the order
# they are considered when several apply.
DEFINITIVE = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
)
_DEFINITIVE_MESSAGE = {
    grpc.StatusCode.PERMISSION_DENIED: "The shareholders refused the verification ticket.",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "Too many verification attempts for this subject; try again later.",
    grpc.StatusCode.NOT_FOUND: "The subject is not enrolled.",
}
# A node's considered refusal of this verification (attempt limit reached,
# ticket refused) is not worked around by asking the other nodes.
_NO_HEDGE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED})
# How long a node that failed at transport level is asked last.
_DOWN_MEMORY_S = 5.0


def release_order(nodes: tuple[ShareholderEndpoint, ...], k: int, hedge_ms: int, tenant: str, subject: str,
                  down_since: dict[str, float]) -> tuple[tuple[ShareholderEndpoint, ...], tuple[ShareholderEndpoint, ...]]:
    """(the k nodes to ask first, the others): nodes seen up first.

    The start in the committee is a hash of the subject, so load spreads
    over the nodes while one subject's attempts go to the same k nodes
    and meet their attempt limits as if every node were asked (rotating
    per call would let n/k times more attempts through).
    """
    if hedge_ms == 0 or len(nodes) <= k:
        return tuple(nodes), ()
    start = zlib.crc32(f"{tenant}\x00{subject}".encode()) % len(nodes)
    rotated = nodes[start:] + nodes[:start]
    now = time.monotonic()
    # A node that failed at transport level in the last few seconds is asked last.
    ordered = sorted(rotated, key=lambda e: now - down_since.get(e.name, -1e9) < _DOWN_MEMORY_S)
    return tuple(ordered[:k]), tuple(ordered[k:])


class Release:
    """The release and rejoin of one subject's template for one Verify (fail closed).

    ``matcher`` is the ``MatcherService`` (its committee, configuration,
    node health and its ``node_failed`` / ``suspect`` reports).
    """

    def __init__(self, matcher, *, tenant: str, subject: str, dimension: int, decision_id: str, ticket,
                 identify_query_id: str = "", nodes: tuple[ShareholderEndpoint, ...] | None = None) -> None:
        self.m = matcher
        self.tenant, self.subject, self.dimension, self.decision_id = tenant, subject, dimension, decision_id
        # Under an IDENTIFY ticket (confirmation of a query's candidate): the query and the subject.
        self.request = shareholder_pb2.ReleaseShareRequest(
            ticket=ticket, identify_query_id=identify_query_id, subject=subject if identify_query_id else "")
        self.k, self.n = matcher.k, matcher.n
        # The nodes that may release: every node, or an identify query's three (only they hold its confirmation).
        self.nodes = tuple(matcher.cfg.shareholders if nodes is None else nodes)
        # (share, key share) pairs in hand, per epoch and node index.
        self.by_epoch: dict[int, dict[int, tuple[record.Share, record.KeyShare]]] = {}
        self.failures: list[Outcome] = []
        # Unusable shares seen so far (each makes the other nodes be asked).
        self.unusable = 0
        self.tried: set[frozenset] = set()
        self.integrity_failed = False
        # Nodes whose share has another dimension than the probe: the
        # subject's modality is another one if no node has a share of this
        # one (the caller's mistake), else those nodes are suspects.
        self.off_dimension: list[ShareholderEndpoint] = []
        self.rest: tuple[ShareholderEndpoint, ...] = ()
        self.gather = None

    def run(self, meanwhile: Callable[[], object] | None = None) -> record.JoinResult:
        """Release shares from k nodes (more only if needed) and rejoin; status errors when no decision can be made.

        ``meanwhile`` runs once the first calls are on their way.
        """
        cfg = self.m.cfg
        first, self.rest = release_order(self.nodes, self.k, cfg.hedge_ms, self.tenant, self.subject,
                                         self.m.down_since)
        self.gather = self.m.committee.fan_out("ReleaseShare", self.request, nodes=first)
        if meanwhile is not None:
            meanwhile()
        hedge_at = time.monotonic() + cfg.hedge_ms / 1000.0
        while True:
            if self.rest:
                outcome = self.gather.poll(max(0.0, hedge_at - time.monotonic()))
                if outcome is None:
                    if self.gather.pending == 0 and any(f.code in _NO_HEDGE for f in self.failures):
                        break  # the first k answered and one refused this verification
                    self._ask_rest()  # hedge time passed, or no epoch has k shares yet
                    continue
            else:
                outcome = self.gather.next()
                if outcome is None:
                    break
            if self._take(outcome):
                self._ask_rest()
            result = self._attempt()
            if result is None:
                if self.integrity_failed:
                    self._ask_rest()
                continue
            # Shares that arrived meanwhile are checked against the polynomial
            # of the ones that passed (no waiting, no second MAC check): a
            # lying node is named even when it was not needed for this decision.
            for late in self.gather.arrived():
                self._take(late)
            self._name_suspects(result)
            return result
        raise self._no_decision()

    # --- the steps ----------------------------------------------------------

    def _ask_rest(self) -> None:
        if self.rest:
            self.m.committee.fan_out("ReleaseShare", self.request, nodes=self.rest, into=self.gather)
            self.rest = ()

    def _take(self, outcome: Outcome) -> bool:
        """Keep a node's usable shares; True when the other nodes should be asked now.

        A failure, or an unusable share, makes the other nodes be asked,
        except for a node's considered refusal of this verification.
        """
        node = outcome.node
        if not outcome.ok:
            self.m.node_failed(outcome, "ReleaseShare")
            if outcome.code in TRANSPORT_CODES:
                self.m.down_since[node.name] = time.monotonic()
            self.failures.append(outcome)
            return outcome.code not in _NO_HEDGE
        self.m.down_since.pop(node.name, None)
        shares = list(outcome.response.shares)
        if not shares:
            self.failures.append(Outcome(node, None, grpc.StatusCode.NOT_FOUND, "no share"))
            return True
        keys = {k.epoch: k for k in outcome.response.mac_keys}
        unusable_before = self.unusable
        for msg in shares:
            if msg.threshold != self.k or msg.shareholders != self.n:
                # Another committee's epoch, served while a reshare switches over: not ours, not a fault.
                continue
            if msg.dimension != self.dimension and msg.tenant == self.tenant and msg.subject == self.subject:
                self.off_dimension.append(node)
                self.unusable += 1  # ask the other nodes, as for an unusable share
                continue
            problem = self._problem(msg, keys.get(msg.epoch), node)
            pair = None
            if not problem:
                try:
                    pair = (wire.share(msg), wire.key_share(keys[msg.epoch]))
                except InvalidShares:
                    problem = "share is malformed"
                    self.integrity_failed = True
            if problem:
                self._suspect(node, problem)
                self.unusable += 1
                continue
            self.by_epoch.setdefault(msg.epoch, {})[node.index] = pair
        return self.unusable > unusable_before

    def _problem(self, msg, key, node: ShareholderEndpoint) -> str | None:
        # Why a released share cannot be this node's share of this subject, or None.
        if msg.tenant != self.tenant or msg.subject != self.subject:
            return "share labelled for another subject"
        if msg.index != node.index:
            return "share carries another shareholder's index"
        if msg.threshold != self.k or msg.shareholders != self.n or msg.dimension != self.dimension:
            return "share does not fit the configured committee or dimension"
        if msg.mac_count != record.MAC_COUNT or len(msg.values) != 4 * (self.dimension + record.MAC_COUNT):
            return "share has the wrong length"
        if (key is None or key.index != node.index or key.dimension != self.dimension
                or len(key.values) != 4 * epoch_mac.TAG_COUNT * self.dimension):
            return "share without a fitting MAC key share"
        return None

    def _attempt(self) -> record.JoinResult | None:
        # Rejoin the newest epoch with k shares in hand, if not tried yet.
        ready = [e for e, group in self.by_epoch.items() if len(group) >= self.k]
        if not ready:
            return None
        epoch = max(ready)
        group = dict(self.by_epoch[epoch])
        if frozenset(group) in self.tried:
            return None
        self.tried.add(frozenset(group))
        try:
            return record.join([s for s, _ in group.values()], [k for _, k in group.values()])
        except (IntegrityError, InvalidShares):
            self.integrity_failed = True
            logs.event(
                self.m.log, "shares do not rejoin consistently; waiting for more", logging.WARNING,
                decision_id=self.decision_id, tenant=self.tenant, subject=self.subject, epoch=epoch,
                nodes=[self.m.by_index[i].name for i in sorted(group)],
            )
            return None

    def _name_suspects(self, result: record.JoinResult) -> None:
        # Every node whose share is not on the polynomial that passed, and
        # every node that sent a share of another dimension.
        held = self.by_epoch[result.epoch]
        late = [pair for index, pair in held.items() if index not in result.used]
        found = set(result.suspects) | set(record.off_polynomial([held[i] for i in result.used], late))
        for index in sorted(found):
            self._suspect(self.m.by_index[index], "share outvoted by the others", epoch=result.epoch)
        for node in self.off_dimension:
            self._suspect(node, "share of another dimension than the enrolled one's")

    def _suspect(self, node: ShareholderEndpoint, reason: str, **fields) -> None:
        self.m.suspect(node, reason, decision_id=self.decision_id, tenant=self.tenant, subject=self.subject,
                       **fields)

    def _no_decision(self) -> status.RpcError:
        # No k shares rejoined: the caller's mistake, an inconsistency, or too few answers.
        if self.off_dimension and not self.by_epoch:
            return status.InvalidArgument(
                f"The subject is enrolled under another modality than this {self.dimension}-value probe's.")
        if self.integrity_failed:
            logs.event(
                self.m.log, "inconsistent shares could not be outvoted", logging.ERROR,
                decision_id=self.decision_id, tenant=self.tenant, subject=self.subject,
                nodes=sorted({self.m.by_index[i].name for g in self.by_epoch.values() for i in g}),
            )
            return status.DataLoss(
                "The subject's shares are inconsistent; no decision was made and the operators are alerted."
            )
        return self._no_quorum(max((len(g) for g in self.by_epoch.values()), default=0))

    def _no_quorum(self, best: int) -> status.RpcError:
        # Fewer than k usable shares: say why, as definitely as the answers allow.
        codes = Tally(o.code for o in self.failures)
        enough_to_rule_out = len(self.nodes) - self.k + 1  # this many refusals leave fewer than k possible shares
        for code in DEFINITIVE:
            if codes[code] >= enough_to_rule_out:
                return status.error(code, _DEFINITIVE_MESSAGE[code])
        answered = {o.code for o in self.failures if o.code not in TRANSPORT_CODES}
        if best == 0 and len(answered) == 1:
            (code,) = answered
            if code in _DEFINITIVE_MESSAGE:
                return status.error(code, _DEFINITIVE_MESSAGE[code])
        return status.Unavailable(
            f"Fewer than k = {self.k} shareholders answered with a share; no decision was made."
        )
