from .cli import app

# Guarded: `coreinfer bench` spawns processes, which import this module as __mp_main__.
if __name__ == "__main__":
    app(prog_name="coreinfer")
