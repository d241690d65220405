"""The Label Studio ML backend protocol on Flask: /setup, /predict, /health, /metrics, /webhook.

    app     create_app(): settings from the environment, the model loaded once, the routes
    wsgi    the gunicorn entry point (`blip-backend serve` runs `gunicorn backend.server.wsgi:app`)
    worker  the gunicorn worker class: gthread with a lane of its own for /health, /setup, /metrics and
            /webhook, and new connections refused as soon as a graceful shutdown begins

May use backend.runtime and backend.annotate.
"""
