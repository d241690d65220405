"""The serving side: BLIP on OpenVINO, without torch, behind Label Studio's ML backend protocol.

    runtime/    BLIP on OpenVINO: a model directory -> captions, answers, ranked choices
    annotate/   Label Studio's side: labeling config -> asks, task images, tasks -> predictions
    server/     the ML backend protocol on Flask (gunicorn: backend.server.wsgi:app)
    prelabel/   `blip-backend prelabel`: a whole project through Label Studio's API, resumable, Ray optional
    __main__    the `blip-backend` command (ask, serve, prelabel)

Imports point one way: runtime <- annotate <- {server, prelabel} <- __main__; model_build uses
runtime (and annotate, for calibration data), bench anything but prelabel; tests/test_layers.py enforces it.
"""
