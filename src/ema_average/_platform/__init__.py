"""What must stay written by hand, fenced in one place: the Ctrl-C story and signal dispositions, the output
lock, the pool of open files, libc calls and every private torch API behind a named function.

Nothing here knows of averages or checkpoints. ``docs/platform.md`` says which promise each guard keeps
and which test pins it."""
