"""The ``sinkguard`` command line: one module per command group, the demo, and terminal output."""
