import os

# as `make` and the tests do: idle OpenMP threads sleep instead of spinning (cores shared with others)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tdd_lightning.bench.cli import main  # noqa: E402
from tdd_lightning.errors import exit_on_user_error  # noqa: E402

exit_on_user_error(main)
