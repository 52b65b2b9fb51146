"""Data contracts and validation: reading dataset files, the contract's checks (Great Expectations),
the two validation passes, the split, quarantine and the offline report."""
