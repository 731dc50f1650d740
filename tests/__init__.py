"""quebert's tests."""

from hypothesis import settings

# Deterministic property tests: same examples on every run, no example
# database, no deadlines that flake on a loaded machine.
settings.register_profile("quebert", database=None, deadline=None, derandomize=True)
settings.load_profile("quebert")
