"""Guest-side code of SecVF images: the init scripts (package data) and the exec agent.

:mod:`secvf.guest.agent` is the agent itself (standard library only: it runs inside the
guest). :func:`secvf.image.agent_zipapp.agent_zipapp` packs it, with the exec protocol, into
the one file that sandbox images and the unit tests run.
"""
