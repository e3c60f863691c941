import os, yappi
from celery.signals import worker_shutdown
yappi.set_clock_type("cpu")
yappi.start(builtins=True, profile_threads=True)

@worker_shutdown.connect(weak=False)
def dump(**_):
    yappi.stop()
    yappi.get_func_stats().save(f"/tmp/yprof-{os.getpid()}.pstat", type="pstat")
