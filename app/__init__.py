"""The FER2013 inference service: a FastAPI app that serves a checkpoint written by training.

Layout: ``settings`` (configuration from the environment), ``model`` (loading a checkpoint
and running it), ``images`` (turning uploaded bytes into a PIL image), ``faces`` (finding the
faces in it), ``concurrency`` (how many inferences run and wait at once), ``limits`` (the
request-body size limit), ``errors`` (domain exceptions and the one place that turns them
into responses), ``routes/`` (one router per resource), ``main`` (the app factory and its
lifespan). Nothing here imports ``training``.

One process-wide setting is made here, because it must be in place before torch is first
imported: ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (set it to override it, or set it empty
for OpenMP's own default). With OpenMP's default, the threads of a forward pass keep spinning on
their cores for a while after it ends; in a service that is CPU time taken from the next
request's decoding, face detection and HTTP handling (``bench/results/service_configs.json``).
"""

import os

if not os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE").strip():
    del os.environ["OMP_WAIT_POLICY"]  # set empty: OpenMP's own default (spin a while, then sleep)
