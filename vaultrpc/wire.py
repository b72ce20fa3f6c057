"""The one boundary between wire messages and the vault's types.

``vault/`` never imports generated protobuf code: a service parses each
message it receives here, once, into a frozen, validated vault type
(``vault.record.Share``, ``vault.record.KeyShare``), and builds the messages
it sends from those types here. A parse raises the vault's own error
(``InvalidShares``), which ``vaultrpc.status`` maps to INVALID_ARGUMENT; a
caller that holds a vault type never checks its fields again.
"""
from __future__ import annotations

from splitvault.v1 import common_pb2
from vault import record
from vault.errors import InvalidShares


def share(msg: common_pb2.ShareRecord) -> record.Share:
    """A ShareRecord message as a validated Share (InvalidShares if it is not one)."""
    if not isinstance(msg, common_pb2.ShareRecord):
        raise InvalidShares("A share record must be a ShareRecord message.")
    return record.Share(
        tenant=msg.tenant, subject=msg.subject, index=msg.index, epoch=msg.epoch, threshold=msg.threshold,
        shareholders=msg.shareholders, dimension=msg.dimension, codec_version=msg.codec_version,
        mac_count=msg.mac_count, values=msg.values, request_id=msg.request_id,
    )


def share_message(s: record.Share) -> common_pb2.ShareRecord:
    """The ShareRecord message of a Share."""
    return common_pb2.ShareRecord(
        tenant=s.tenant, subject=s.subject, index=s.index, epoch=s.epoch, threshold=s.threshold,
        shareholders=s.shareholders, dimension=s.dimension, codec_version=s.codec_version,
        mac_count=s.mac_count, values=s.values, request_id=s.request_id,
    )


def key_share(msg: common_pb2.MacKeyShare) -> record.KeyShare:
    """A MacKeyShare message as a validated KeyShare (InvalidShares if it is not one)."""
    if not isinstance(msg, common_pb2.MacKeyShare):
        raise InvalidShares("A MAC key share must be a MacKeyShare message.")
    return record.KeyShare(index=msg.index, epoch=msg.epoch, dimension=msg.dimension, values=msg.values)


def key_share_message(k: record.KeyShare) -> common_pb2.MacKeyShare:
    """The MacKeyShare message of a KeyShare."""
    return common_pb2.MacKeyShare(index=k.index, epoch=k.epoch, dimension=k.dimension, values=k.values)
