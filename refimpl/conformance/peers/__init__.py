"""Built-in peer targets: PEFT, bitsandbytes and mergekit adapted to refimpl's op names,
NumPy in and out. Each imports its peer lazily; a missing peer raises ImportError at lookup."""
