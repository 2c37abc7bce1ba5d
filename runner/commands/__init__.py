"""CLI subcommands, one module per group; each exposes ``register(subparsers)``.

Handlers import heavy libraries inside themselves so that ``qlora --help`` and the pure
commands (validate, schema, plan, render) stay fast and need no GPU stack.
"""
