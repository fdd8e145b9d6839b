"""The commands (layer 8 of 9, see README, Architecture): what `dllp2p run`, `chat` and `status` do with
their frozen configs; cli.py parses the arguments into those configs and calls them.

    run.py       a prompt: through a daemon (wire.client), or in this process (any engine, --workers)
    chat.py      a conversation, turn by turn, through a daemon or one engine kept in this process
    status.py    what a daemon knows, as a live table or JSON
    progress.py  the set-up's progress events (session.progress) drawn as rich progress bars
"""
