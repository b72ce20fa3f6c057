"""The domain's exceptions. Messages are whole sentences and never contain
template, probe, share or key material."""


class VaultError(Exception):
    """Base of every splitvault domain error."""


class InvalidTemplate(VaultError, ValueError):
    """A template or probe cannot be encoded (wrong shape, NaN, inf, zero...)."""


class InvalidShares(VaultError, ValueError):
    """A set of shares cannot be rejoined (too few, duplicate indices, mixed shapes)."""


class IntegrityError(VaultError):
    """Rejoined shares failed the integrity check: a share is wrong or swapped.

    ``suspects`` names the shareholder indices found inconsistent, when enough
    shares were available to tell; it is for the audit log, never the caller.
    """

    def __init__(self, message: str, suspects: tuple[int, ...] = ()):
        super().__init__(message)
        self.suspects = suspects


class InvalidName(VaultError, ValueError):
    """An identifier, token, name or index breaks vault.names' rules."""


class InvalidTicket(VaultError):
    """A verification ticket is malformed, forged, expired or for someone else."""


class EnvelopeError(VaultError):
    """A sealed share could not be opened: wrong key, tampered or moved ciphertext."""


class AuditChainError(VaultError):
    """An audit chain does not verify; ``seq`` is the first broken entry."""

    def __init__(self, message: str, seq: int):
        super().__init__(message)
        self.seq = seq
