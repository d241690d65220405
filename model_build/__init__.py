"""Build OpenVINO BLIP model directories."""
