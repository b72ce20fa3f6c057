"""The node's schema and its migrations, written once for every dialect.

Column types are tokens (``{int}``, ``{blob}``, ``{key}``) that the dialect
fills in (``shareholders.storage.dialect``); on SQLite they give exactly the
statements earlier versions of the node ran, so an existing file migrates as
before.
"""
from __future__ import annotations

# Each migration takes the schema from version i-1 to i, in one transaction.
MIGRATIONS: tuple[tuple, ...] = (
    (
        """CREATE TABLE node_state (
            id {int} PRIMARY KEY CHECK (id = 1),
            name TEXT NOT NULL,
            idx {int} NOT NULL,
            current_epoch {int} NOT NULL,
            committee_json TEXT NOT NULL,
            updated_ms {int} NOT NULL
        )""",
        """CREATE TABLE shares (
            tenant {key} NOT NULL,
            subject {key} NOT NULL,
            epoch {int} NOT NULL,
            idx {int} NOT NULL,
            threshold {int} NOT NULL,
            n {int} NOT NULL,
            dimension {int} NOT NULL,
            codec_version {int} NOT NULL,
            mac_count {int} NOT NULL,
            request_id TEXT NOT NULL,
            kek_version {int} NOT NULL,
            wrapped_dk {blob} NOT NULL,
            nonce {blob} NOT NULL,
            ciphertext {blob} NOT NULL,
            stored_ms {int} NOT NULL,
            PRIMARY KEY (tenant, subject, epoch)
        )""",
        # Rotation walks the rows still under an old KEK version.
        "CREATE INDEX shares_by_kek ON shares (kek_version)",
        """CREATE TABLE audit_log (
            seq {int} PRIMARY KEY,
            time_ms {int} NOT NULL,
            node TEXT NOT NULL,
            event TEXT NOT NULL,
            actor TEXT NOT NULL,
            request_id TEXT NOT NULL,
            tenant {key} NOT NULL,
            subject {key} NOT NULL,
            details_json TEXT NOT NULL,
            prev_hash {blob} NOT NULL,
            entry_hash {blob} NOT NULL
        )""",
        # Start-up rebuilds replay and attempt state from recent entries.
        "CREATE INDEX audit_by_time ON audit_log (time_ms)",
        """CREATE TABLE audit_checkpoints (
            seq {int} PRIMARY KEY,
            entry_hash {blob} NOT NULL,
            time_ms {int} NOT NULL,
            node TEXT NOT NULL,
            signature {blob} NOT NULL
        )""",
    ),
    # 2: maintenance sessions (refresh, reshare, first MAC key, KEK rotation):
    # one row per session; the row in an open state is the node's lock.
    # Prepared rows of a new epoch live in ``shares``, unserved until the
    # session commits.
    (
        """CREATE TABLE maintenance_sessions (
            session_id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            from_epoch {int} NOT NULL,
            new_epoch {int} NOT NULL,
            plan_json TEXT NOT NULL,
            seed_kek_version {int},
            seed_wrapped_dk {blob},
            seed_nonce {blob},
            seed_ciphertext {blob},
            skipped {int} NOT NULL DEFAULT 0,
            actor TEXT NOT NULL,
            started_ms {int} NOT NULL,
            updated_ms {int} NOT NULL
        )""",
        "CREATE INDEX maintenance_by_state ON maintenance_sessions (state)",
    ),
    (
        # A refresh's new-minus-old values, sealed per prepared batch, for the
        # check (shareholders.epochs); deleted with the session's old epoch.
        """CREATE TABLE refresh_check_diffs (
            session_id TEXT NOT NULL,
            first_tenant {key} NOT NULL,
            first_subject {key} NOT NULL,
            width {int} NOT NULL,
            keys_json TEXT NOT NULL,
            fingerprints {blob} NOT NULL,
            kek_version {int} NOT NULL,
            wrapped_dk {blob} NOT NULL,
            nonce {blob} NOT NULL,
            ciphertext {blob} NOT NULL,
            PRIMARY KEY (session_id, first_tenant, first_subject, width)
        )""",
    ),
    (
        # 4: records [s | t] under the epoch's MAC key (vault.epoch_mac): this
        # node's share of each epoch's key, sealed like a share. A database
        # of version 1-3 holding shares is in the old record format (AMD
        # MAC) and is refused (``migrate``), not converted.
        """CREATE TABLE mac_keys (
            epoch {int} PRIMARY KEY,
            threshold {int} NOT NULL,
            width {int} NOT NULL,
            session_id TEXT NOT NULL,
            kek_version {int} NOT NULL,
            wrapped_dk {blob} NOT NULL,
            nonce {blob} NOT NULL,
            ciphertext {blob} NOT NULL,
            stored_ms {int} NOT NULL
        )""",
    ),
    (
        # 5: Identify's gallery cache reads every row's version before each
        # query (``tenant_row_versions``): a covering index, so that read never
        # touches the ~2 KB rows themselves. (tenant, subject) lead, as in the
        # primary key: with dimension second, SQLite's planner took this
        # covering index for the per-subject lookups of every store and
        # scanned a tenant's whole index per record (bulk enrolment 10x slower).
        "CREATE INDEX shares_identify ON shares (tenant, subject, epoch, dimension, request_id, nonce)",
    ),
    (
        # 6: the batch items a bulk store honoured, per batch ticket and store
        # (8-byte hashes of their request ids, packed), until the ticket
        # expires: a restarted node refuses them again (the audit entry of a
        # bulk store names its tickets, not each item).
        """CREATE TABLE used_batch_items (
            digest TEXT NOT NULL,
            stored_ms {int} NOT NULL,
            expires_ms {int} NOT NULL,
            items {blob} NOT NULL
        )""",
        "CREATE INDEX used_batch_items_by_expiry ON used_batch_items (expires_ms)",
    ),
    (
        # 7: the gallery group a record was enrolled under (the provider signs
        # it in the write ticket; '' = none), and a covering index for
        # Identify's per-(tenant, group) version read: it seeks on the group
        # and never touches the rows. A per-subject lookup still takes the
        # primary key or shares_identify (two equal columns beat one).
        "ALTER TABLE shares ADD COLUMN grp TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX shares_by_group ON shares (tenant, grp, subject, epoch, dimension, request_id, nonce)",
    ),
    (
        # 8: a per-tenant change counter that every write to ``shares``
        # (insert, replace, update, delete) moves in its own transaction, by
        # triggers (the dialect's: no write path can forget it). Identify's
        # gallery cache reads this one row before a query and lists the rows'
        # versions only when it moved. A tenant without a row has version 0.
        """CREATE TABLE share_versions (
            tenant {key} PRIMARY KEY,
            version {int} NOT NULL
        )""",
        "INSERT INTO share_versions (tenant, version) SELECT DISTINCT tenant, 1 FROM shares",
        lambda dialect: dialect.share_version_triggers(),
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
# The first schema version whose records are [s | t] under an epoch MAC key.
RECORD_FORMAT_VERSION = 4


class SchemaError(RuntimeError):
    """The database is from a newer version of the node, or belongs to another node."""


def migrate(db) -> int:
    """Bring ``db``'s schema to SCHEMA_VERSION; returns the version found before."""
    if db.has_table("schema_version"):
        # Up to date: nothing to write (the node's role on PostgreSQL need not own the tables).
        row = db.execute("SELECT version FROM schema_version").fetchone()
        if row is not None and row[0] == SCHEMA_VERSION:
            return row[0]
    with db.transaction():
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version {int} NOT NULL)", ddl=True)
        row = db.execute("SELECT version FROM schema_version").fetchone()
        found = row[0] if row else 0
        if row is None:
            db.execute("INSERT INTO schema_version (version) VALUES (0)")
        if found > SCHEMA_VERSION:
            raise SchemaError(
                f"The database has schema version {found}, newer than this node's {SCHEMA_VERSION}; upgrade the node."
            )
        if 0 < found < RECORD_FORMAT_VERSION and db.execute("SELECT COUNT(*) FROM shares").fetchone()[0]:
            raise SchemaError(
                f"The database holds shares in the old record format (schema version {found}, AMD MAC); this "
                "node reads only records under an epoch MAC key: re-enrol into a new node database."
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for step in MIGRATIONS[version - 1]:
                # A step is a statement, or a function of the dialect giving its own (triggers).
                for statement in (step(db.dialect) if callable(step) else (step,)):
                    db.execute(statement, ddl=True)
            db.execute("UPDATE schema_version SET version = ?", (version,))
        if found < SCHEMA_VERSION:
            db.dialect.secure(db.conn)
    return found
