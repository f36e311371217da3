"""Write numbered messages to an inbox as fast as possible, one per write(2).

Prints the number of every message whose write returned success, then, when a
write fails (the server is gone), the number it was writing and exits.
Usage: numbered_writer.py INBOX WRITER_ID
"""

import os
import sys

inbox, writer = sys.argv[1], sys.argv[2]
fd = os.open(inbox, os.O_WRONLY)
acked = []
i = 0
try:
    while True:
        os.write(fd, f"{writer}-{i}\n".encode())
        acked.append(i)
        i += 1
except OSError:
    pass
print(" ".join(map(str, acked)))
print(i)  # the one in flight when the server died: it may or may not be in the log
