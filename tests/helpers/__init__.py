"""What test modules share (issue 15): a test module imports these, never another test module.

- ``recording``: a Flower grid that records every message, and opening a sealed reply;
- ``subprocesses``: running ``fedlora`` as a real process or as a job to send signals to, how
  far its run got, the processes its session still has, and the cleanup;
- ``deployment``: a loopback deployment of real ``fedlora`` processes and their process trees;
- ``local_superlink``: ``flwr run .`` against a local simulation SuperLink of the test's own;
- ``fixed_point_bound``: the error bound of secure sum's fixed-point encoding;
- ``flower_identity``: the run and node identity Flower's runtimes stamp on messages.
"""
