"""splitvault's pure core: the prime field, Shamir sharing, the template codec,
share integrity, share records, envelope encryption, tickets, the audit-chain
format and the dev PKI recipes. No network, no disk: services and the CLI do
the I/O."""
