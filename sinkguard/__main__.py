import sys

from sinkguard.cli.main import main

sys.exit(main())
