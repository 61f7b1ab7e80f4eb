import sys

from negprompt.interfaces.cli import main

sys.exit(main())
