"""Label Studio's own labeling templates, as users have them (annotation_templates/computer-vision)."""

# "Image Captioning", unchanged
CAPTIONING = (
    '<View><Image name="image" value="$captioning"/><Header value="Describe the image:"/>'
    '<TextArea name="caption" toName="image" placeholder="Enter description here..." rows="5" '
    'maxSubmissions="1"/></View>'
)


def vqa(questions: int = 2, extra: str = "") -> str:
    """ "Visual Question Answering" with its first `questions` question blocks, plus `extra` controls."""
    blocks = "".join(
        f'\n  <Header value="Q{n}: Please answer the question:"/>\n  <Text name="q{n}" value="$q{n}"/>'
        f'\n  <TextArea name="answer{n}" toName="q{n}" rows="1" maxSubmissions="1"/>'
        for n in range(1, questions + 1)
    )
    return f'<View>\n  <Image name="image" value="$image"/>{blocks}{extra}\n</View>'
