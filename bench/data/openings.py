"""Movie-review openings we wrote, for the sentiment benchmarks (the policy continues each one)."""

SUBJECTS = [
    "The new space drama", "This quiet family comedy", "The director's latest thriller", "This animated musical",
    "The long-awaited sequel", "This low-budget horror film", "The period romance", "This documentary about bees",
    "The courtroom drama", "This heist movie", "The coming-of-age story", "This black-and-white remake",
    "The superhero team-up", "This slow-burning western", "The French art-house film", "This disaster movie",
    "The biopic of a jazz singer", "This road-trip comedy", "The war epic", "This small-town mystery",
]
FRAMES = [
    "{s} opens with", "I watched {s} last night, and", "From the first scene, {s}", "Going into {s}, I expected",
    "My honest take on {s}:", "Halfway through {s}, I realised", "{s} is the kind of film that",
    "The cast of {s}", "The soundtrack of {s}", "Everyone is talking about {s}, and", "Two hours later, {s}",
    "The ending of {s}", "Critics have argued about {s}, but", "The pacing of {s}", "The dialogue in {s}",
]


def openings() -> list[str]:
    """300 openings: every subject in every frame."""
    return [frame.format(s=subject) for subject in SUBJECTS for frame in FRAMES]
