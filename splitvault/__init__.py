"""Generated protobuf modules (package splitvault.v1). Do not edit."""
