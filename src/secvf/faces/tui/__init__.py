"""``secvf tui``: the terminal UI, a face over :mod:`secvf.api` like the CLI.

One concept per module: :mod:`.app` (the application, its bindings and how it runs API
calls in worker threads), :mod:`.data` (rows built from API results, text shown from
them), :mod:`.widgets` (the confirmation modal, the progress bar of a long action, the
help screen) and one module per area: :mod:`.vms`, :mod:`.details`, :mod:`.sandboxes`,
:mod:`.exec_pane`, :mod:`.networks`, :mod:`.analyses`, :mod:`.logs`, :mod:`.audit`.
It never opens a socket or starts a process itself. Importing this package loads
nothing: ``secvf tui`` imports :mod:`.app` when it runs (Textual is heavy).
"""
