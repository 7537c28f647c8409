"""`ocrtune infer` without a dataset: the interactive loop (SWIFT-style) and one-shot answers (`--image`/`--query`)."""
from __future__ import annotations

import sys
import threading

from ocrtune.data.images import BadImage, open_image
from ocrtune.data.registry import OCR_PROMPT
from ocrtune.errors import UserError
from ocrtune.infer.args import InferArgs
from ocrtune.infer.args import gen_kwargs as _gen_kwargs
from ocrtune.models.template import IMAGE_TAG

IMAGE_PROMPT = "Input an image path or URL <<< "
QUERY_PROMPT = "<<< "
EXIT_WORDS = ("exit", "quit")


def _read(prompt: str) -> str | None:
    """One line from the user; None at end of input."""
    try:
        return input(prompt)
    except EOFError:
        print(flush=True)
        return None


def _say_error(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def _clean_path(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # a pasted quoted path
        text = text[1:-1]
    return text


def _answer(engine, record: dict, args: InferArgs) -> str:
    """Stream the answer to stdout token by token (or print it whole for beam search / --stream false)."""
    gen = _gen_kwargs(args)
    if not args.stream or args.num_beams > 1:  # transformers streams only greedy/sampled decoding
        answer = engine.generate([record], **gen)[0]
        print(answer, flush=True)
        return answer
    stop = threading.Event()
    pieces: list[str] = []
    stream = engine.stream(record, stop=stop, **gen)
    try:
        for piece in stream:
            pieces.append(piece)
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stop.set()
        stream.close()
        print(" [stopped]", end="")
    print(flush=True)
    return "".join(pieces).strip()


def interactive(engine, args: InferArgs) -> None:
    """SWIFT-style loop: `<<< ` query (empty = the OCR prompt), then one image per `<image>` tag (a
    query without a tag asks for one image when the conversation has none yet; empty = no image)."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print("Input `exit` or `quit` to leave, `clear` to start a new conversation. "
          f"An empty query asks '{OCR_PROMPT}'.", flush=True)
    messages: list[dict] = []
    images: list = []
    while True:
        try:
            query = _read(QUERY_PROMPT)
        except KeyboardInterrupt:
            print(flush=True)
            return
        if query is None or query.strip().lower() in EXIT_WORDS:
            return
        query = query.strip()
        if query.lower() == "clear":
            messages, images = [], []
            print("(conversation cleared)", flush=True)
            continue
        if not query:
            query = IMAGE_TAG + OCR_PROMPT
        tags = query.count(IMAGE_TAG)
        wanted = tags or (0 if images else 1)
        new_images, ok = [], True
        for _ in range(wanted):
            try:
                path = _read(IMAGE_PROMPT)
            except KeyboardInterrupt:
                print(flush=True)
                return
            if path is None:
                return
            path = _clean_path(path)
            if not path:
                if tags:
                    _say_error(f"the query has {tags} <image> tag(s): give an image path or URL for each")
                    ok = False
                break  # no tag: the user chose a text-only turn
            try:
                new_images.append(open_image(path))
            except BadImage as e:
                _say_error(e)
                ok = False
                break
        if not ok:
            continue
        if not tags and new_images:
            query = IMAGE_TAG + query
        turn = {"role": "user", "content": query}
        record = {"messages": messages + [turn], "images": images + new_images}
        try:
            answer = _answer(engine, record, args)
        except (BadImage, ValueError) as e:  # e.g. an image the processor refuses
            _say_error(e)
            continue
        messages += [turn, {"role": "assistant", "content": answer}]
        images += new_images


def one_shot(engine, args: InferArgs) -> str:
    query = args.query.strip() if args.query and args.query.strip() else OCR_PROMPT
    images = []
    if args.image:
        try:
            images = [open_image(_clean_path(args.image))]
        except BadImage as e:
            raise UserError(str(e), "check the --image path or URL") from None
        if IMAGE_TAG not in query:
            query = IMAGE_TAG + query
    elif IMAGE_TAG in query:
        raise UserError("--query has an <image> tag but no --image was given", "pass --image PATH_OR_URL")
    if query.count(IMAGE_TAG) > len(images):
        raise UserError(f"--query has {query.count(IMAGE_TAG)} <image> tags but one --image", "use one <image> tag")
    answer = engine.generate([{"messages": [{"role": "user", "content": query}], "images": images}], **_gen_kwargs(args))[0]
    print(answer, flush=True)
    return answer
