"""The FER2013 inference service: a FastAPI app that serves a checkpoint written by training.

Layout: ``settings`` (configuration from the environment), ``model`` (loading a checkpoint
and running it), ``images`` (turning uploaded bytes into a PIL image), ``faces`` (finding the
faces in it), ``concurrency`` (how many inferences run and wait at once), ``limits`` (the
request-body size limit), ``errors`` (domain exceptions and the one place that turns them
into responses), ``routes/`` (one router per resource), ``main`` (the app factory and its
lifespan). Nothing here imports ``training``.
"""
