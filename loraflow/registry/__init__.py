"""Which registered version serves: reading versions, the promotion gate, race-safe alias moves, the
append-only audit ledger, history and its report, and the pyfunc model that serving loads."""
