"""crgate worker: the Celery app (app.py) and its thin tasks (tasks.py) on the Redis broker."""
