"""One APIRouter per capability; ``service.app.create_app`` wires the lifespan's resources to them."""
