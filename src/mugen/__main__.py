import sys

from mugen.cli import main

sys.exit(main())
