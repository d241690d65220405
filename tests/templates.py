"""Label Studio's own labeling templates, as users have them (annotation_templates/computer-vision)."""

# "Image Captioning", unchanged
CAPTIONING = (
    '<View><Image name="image" value="$captioning"/><Header value="Describe the image:"/>'
    '<TextArea name="caption" toName="image" placeholder="Enter description here..." rows="5" '
    'maxSubmissions="1"/></View>'
)
