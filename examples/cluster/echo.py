"""Echo agent: answers each message with its body and the host it runs on."""

import json
import os

host = os.path.basename(os.path.dirname(os.environ["OUTHEIS_MOUNT"]))
with open("inbox") as inbox, open("outbox", "w") as out:
    for line in inbox:
        m = json.loads(line)
        out.write(json.dumps({"body": {"echo": m["body"], "host": host}}) + "\n")
        out.flush()
