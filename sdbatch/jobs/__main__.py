import sys

from sdbatch.jobs.cli import main

sys.exit(main())
