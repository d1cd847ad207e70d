import os
import sys

from sdbatch.jobs.cli import main

code = main()
# Leave without the interpreter's teardown, where pyarrow's thread pools have aborted the process
# ("terminate called without an active exception", exit 134) after the command had finished:
# the exit status is the command's own. Everything is written and closed by now.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
