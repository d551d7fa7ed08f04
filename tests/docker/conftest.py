# Docker fixtures live in tests/fakes/docker_fixtures.py so runner tests elsewhere can import them too.
from tests.fakes.docker_fixtures import *  # noqa: F401,F403
