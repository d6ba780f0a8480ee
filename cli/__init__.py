"""The ``jobforge`` command line: a cyclopts app that reaches the service only through `jobforge.client`."""
