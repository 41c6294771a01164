import sys

from slaknet.cli import main

sys.exit(main())
