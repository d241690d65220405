"""The bulk command, `blip-backend prelabel`: a whole Label Studio project predicted through its API.

    cli         arguments, exit codes         run          list tasks, batch them, count, report
    worker      predict a batch, write once   ray_actors   the same workers as Ray actors
    api         Label Studio calls, retried   job          what a worker is given and returns
    progress    the progress line

May use backend.runtime and backend.annotate; nothing imports it but the command line (backend.__main__).
"""
