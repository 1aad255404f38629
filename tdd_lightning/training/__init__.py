"""Training glue: the run flow behind train.py, start-up checks, optim, distributed helpers, callbacks."""
