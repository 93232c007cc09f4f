from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    user_id: str
    role: str  # "admin" | "user"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"
