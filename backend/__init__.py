"""Label Studio ML backend: BLIP captions and answers on OpenVINO, without torch."""
