"""Build the default image into a folder before the Ray tests enter their network namespace
(which has no package index): ``python tests/helpers/prebuild.py DIR``. The tests then find it
through ``FLOWSESSION_TEST_IMAGES=DIR`` (the control plane and the cluster's nodes adopt it
instead of building it). A folder that holds a complete build already is left as it is.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from flowsession.config import Settings  # noqa: E402
from flowsession.environments.images import DEFAULT_IMAGE  # noqa: E402
from flowsession.environments.service import EnvironmentService  # noqa: E402
from flowsession.store import open_store  # noqa: E402


def main(folder: str) -> int:
    os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
    images = Path(folder)
    images.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flowsession-prebuild-") as home:
        settings = Settings(home=Path(home), images_path=images)
        svc = EnvironmentService(settings, open_store(settings.db_url))
        image = asyncio.run(svc.images.ensure_built(DEFAULT_IMAGE))
    print(f"image {image.ref} ready in {images} ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
