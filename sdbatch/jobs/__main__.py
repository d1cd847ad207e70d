from sdbatch.errors import exit_without_teardown
from sdbatch.jobs.cli import main

exit_without_teardown(main())
