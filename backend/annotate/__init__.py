"""Label Studio tasks -> predictions, shared by the server and the bulk command.

    labeling    labeling config -> asks (what each TextArea/Choices control wants predicted)
    fetch       which image sources may be read (ALLOWED_IMAGE_HOSTS); a transport that connects only there
    images      the task's image, wherever Label Studio keeps it (uploads, local files, cloud, URLs)
    predict     tasks + asks -> batched BLIP calls -> one prediction entry per task
    interactive a question typed while labeling -> what BLIP is asked, and its reply
    cache       what the vision encoders made of recent images (EMBEDDING_CACHE_MB)
    budget      batch sizes and cache fitted to MEMORY_BUDGET_MB

May use backend.runtime only.
"""
