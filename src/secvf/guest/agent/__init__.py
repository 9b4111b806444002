"""SecVF guest exec agent: runs commands and moves files for the host, over vsock.

Standard library only (Python 3.11, Debian's ``python3`` package: ``json``, ``pty`` and
``termios`` are not in ``python3-minimal``). Packed with :mod:`secvf.exec.protocol` into
one zipapp (:func:`secvf.image.agent_zipapp.agent_zipapp`), installed into AI-sandbox images as
``/usr/lib/secvf/agent/agent.pyz`` and started by init with ``python3 -I``.

Modules, one concept each:

* :mod:`~secvf.guest.agent.errors` - :class:`RequestFailed`, a request that cannot be
  carried out.
* :mod:`~secvf.guest.agent.identity` - guest accounts: lookup, default cwd, acting as a
  user.
* :mod:`~secvf.guest.agent.process_groups` - finding and killing a command's process
  group.
* :mod:`~secvf.guest.agent.connection` - one session's socket, with serialised sends.
* :mod:`~secvf.guest.agent.command` - one exec stream: spawn, pump, supervise, input.
* :mod:`~secvf.guest.agent.output_ring` - a background process's bounded output buffer.
* :mod:`~secvf.guest.agent.detached` - background processes (exec ``detach``) and the
  agent's table of them: limits, ids, ps, kill.
* :mod:`~secvf.guest.agent.attach` - one attach stream following a background process.
* :mod:`~secvf.guest.agent.files` - upload and download streams.
* :mod:`~secvf.guest.agent.session` - one connection: handshake, frame routing, streams.
* :mod:`~secvf.guest.agent.server` - the listener and its sessions.
* :mod:`~secvf.guest.agent.__main__` - the command line and process start-up.

Primer
======

* **Listening.** AF_VSOCK port 2222 on VMADDR_CID_ANY (``--port``), or a Unix socket
  (``--unix PATH``) for host-side tests. One accepted connection is one *session*,
  served by its own thread; sessions are independent, and a session that sends garbage
  gets an ERROR frame and is closed while the others carry on. At most MAX_SESSIONS
  sessions run at once; the next one is refused with ERROR ``busy``.
* **Session lifecycle** (:class:`SessionState`): HANDSHAKE (the client must send
  ``hello`` within HELLO_TIMEOUT_S) → READY (any number of streams) → CLOSED. Closing,
  for whatever reason (client EOF, protocol error, send failure), aborts every stream of
  the session: commands are killed, partial uploads removed.
* **Exec.** A command runs in a new session and process group (``start_new_session``)
  as the requested user (``setgroups/setgid/setuid`` in the child) with a clean
  environment plus the requested variables, in the requested cwd (default
  ``/workspace`` if it exists, else the user's home), with every signal at its default
  disposition (even those the agent inherited as ignored). Two threads per command:
  the *pump* copies the child's stdout/stderr (or PTY) into frames and blocks when the
  client does not read (back-pressure: the pipes fill and the child blocks); the
  *supervisor* waits on a pidfd and enforces the timeout and ``cancel`` even while the
  pump is blocked. When the command ends - normally, by timeout, by cancel or because
  the client went away - every process still in its process group or session is sent
  SIGTERM, then SIGKILL after KILL_GRACE_S. A process that calls ``setsid`` itself
  escapes this (as it would escape any process-group based supervisor).
* **Background processes.** An ``exec`` with ``detach`` starts the same way but is
  not part of the session: its output goes to a ring of its last 1 MiB (dropped bytes
  counted), it survives the connection, and ``ps``, ``attach`` and ``kill`` reach it by
  id from any session. At most 64 run at once; the agent ends them when it gets SIGTERM.
* **Files.** Uploads and downloads open the file *as the requested user*: a short
  forked helper takes that user's credentials, opens the file and passes the descriptor
  back (SCM_RIGHTS). Permission checks are therefore the user's own, and an uploaded
  file is owned by that user. Uploads go to a temporary file in the target directory
  and are renamed into place at ``upload_end``.
* **Keepalive.** While a session has a command running, the agent sends ``keepalive``
  every ``--keepalive-interval`` seconds so the host can tell a silent command from a
  dead agent.
* **Running unprivileged** (host tests): switching to another user is impossible, so an
  exec or file request for any user but the agent's own fails with kind
  ``permission_denied`` (stage ``switch_user``); nothing half-starts.
"""

AGENT_VERSION = "0.1.0"
