"""Settings for every test module."""

import os

from hypothesis import settings

import overspill  # noqa: F401  # first, so grpc is loaded with fork support off (see overspill/__init__)

# Under CI the property tests run the same examples every time, so a red run is one anybody can
# reproduce; a developer's runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")
