"""FreeSWITCH side: outbound ESL codec and unicast audio framing (gevent transport lives apart)."""
