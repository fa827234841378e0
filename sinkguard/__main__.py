import sys

from sinkguard.cli import main

sys.exit(main())
