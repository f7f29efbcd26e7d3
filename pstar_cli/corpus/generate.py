"""Writes prose.txt, the small text corpus pstar ships for its CPU demo.

The corpus is generated here from a hand-written grammar (no outside text): short stories,
letters, dialogues, weather and nature notes, recipes, number sentences, and Chinese stories
and notes, shuffled into one file of about 300 KB. It is regular enough that a tiny byte-level
model's loss falls within a minute or two, and varied enough not to be memorised at once.

    python pstar_cli/corpus/generate.py          # rewrites prose.txt next to this file
"""

import random
from pathlib import Path

TARGET_BYTES = 300_000
SEED = 20261128

NAMES = ["Ada", "Tomas", "Mira", "Jonah", "Lena", "Ravi", "Odile", "Kofi", "Ines", "Bram", "Sana",
         "Felix", "Nora", "Emil", "Yara", "Hugo", "Talia", "Owen", "Priya", "Milo", "Greta", "Ishan"]
ROLES = ["baker", "ferry pilot", "clockmaker", "beekeeper", "librarian", "lighthouse keeper",
         "shepherd", "potter", "carpenter", "night nurse", "map maker", "fisher", "gardener",
         "teacher", "blacksmith", "weaver", "postman", "astronomer"]
PLACES = ["a village by the river", "a town at the edge of the salt marsh", "a hill farm above the valley",
          "a harbour town full of gulls", "a quiet street behind the market", "an island with one road",
          "a mountain pass where the snow stays late", "a city of bridges", "a forest settlement",
          "a wide plain of barley"]
OBJECTS = ["a brass key", "a blue umbrella", "a wooden box", "an old map", "a silver whistle",
           "a jar of honey", "a broken lantern", "a folded letter", "a small red boat", "a clay cup",
           "a pair of boots", "a loaf of rye bread", "a compass", "a ball of green wool", "a kite"]
ANIMALS = ["a grey cat", "a lame fox", "an old dog", "a crow", "a goat", "a hedgehog", "a heron",
           "a pony", "a family of ducks", "a lost lamb"]
FEELINGS = ["glad", "tired", "curious", "worried", "calm", "proud", "restless", "hopeful", "lonely"]
TIMES = ["At dawn", "One windy morning", "Late in the afternoon", "On the first day of spring",
         "In the middle of winter", "After a long week of rain", "Just before supper",
         "On a market day", "When the tide was low", "Long after midnight"]
WEATHER = ["the rain fell softly on the roofs", "a cold wind came down from the north",
           "the sky was clear and pale", "fog lay thick over the fields", "the sun was warm on the stones",
           "snow had covered the paths", "thunder rolled far away", "the air smelled of cut grass"]
TASKS = ["mend the fence", "find the missing sheep", "carry bread to the school",
         "repair the bell in the tower", "count the boats in the harbour", "plant a row of beans",
         "return a borrowed book", "fix the leaking roof", "deliver a parcel across the river",
         "light the lamps along the pier", "gather apples before the frost"]
OBSTACLES = ["the bridge had washed away", "the path was blocked by a fallen tree",
             "the door was locked", "a storm was coming", "nobody knew the way",
             "the cart had lost a wheel", "the river was too high to cross", "the lamp would not light"]
HELPERS = ["a kind stranger", "an old friend", "a child from the next farm", "the miller's daughter",
           "a traveller with a dog", "the woman who sold fish", "a boy with a bicycle"]
ENDINGS = ["and everyone shared a meal that evening", "and the work was finished before dark",
           "and from then on they met every week", "and nobody forgot that day",
           "and the village felt a little warmer", "and the next morning was bright and still"]

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
           "nineteen", "twenty"]
SEASONS = {"spring": ["the first blossom", "young leaves", "lambs in the field", "cold bright mornings"],
           "summer": ["long evenings", "ripe cherries", "dust on the road", "swallows over the pond"],
           "autumn": ["falling leaves", "wet dark soil", "geese flying south", "the smell of smoke"],
           "winter": ["frost on the glass", "short grey days", "bare trees", "the crackle of a fire"]}
DISHES = {"bread": ["flour", "water", "salt", "yeast"], "soup": ["onions", "carrots", "beans", "stock"],
          "pancakes": ["eggs", "milk", "flour", "butter"], "porridge": ["oats", "milk", "honey", "salt"],
          "stew": ["potatoes", "leeks", "barley", "thyme"], "salad": ["lettuce", "radishes", "oil", "lemon"]}

ZH_NAMES = ["小明", "小红", "阿兰", "老王", "李奶奶", "张老师", "小芳", "阿强", "陈叔叔", "小雨"]
ZH_PLACES = ["河边", "山上", "村口", "集市", "学校", "小镇", "海边", "竹林里", "田野中", "老桥旁"]
ZH_TIMES = ["一天早上", "傍晚的时候", "春天来了", "下雨的那天", "冬天的夜里", "秋天的午后", "天刚亮"]
ZH_THINGS = ["一把伞", "一封信", "一只小猫", "一篮苹果", "一本旧书", "一盏灯", "一条小船", "一只风筝"]
ZH_ACTIONS = ["帮助邻居", "种了一棵树", "修好了屋顶", "找到了回家的路", "学会了写字", "做了一锅汤",
              "送来了热茶", "数清了星星"]
ZH_FEELINGS = ["很高兴", "有点累", "非常安静", "心里很暖", "有些担心", "十分好奇"]
ZH_WEATHER = ["天很蓝", "风很大", "雨下个不停", "雾很浓", "太阳暖暖的", "雪静静地落下"]

HANDWRITTEN = [
    "The lighthouse on the north cape has no keeper any more, but the light still turns every night. "
    "People in the harbour say that the lamp remembers the way the old keeper wound it, slowly and "
    "with great care, and that it keeps his rhythm out of habit. The fishers do not believe this, "
    "yet they nod to the tower when they pass it in the morning.",
    "A good map does not show everything. It leaves out the mud and the smell of the market and the "
    "dog that barks at every cart. It keeps only what helps you find your way. Learning to draw a map "
    "is learning what to leave out.",
    "When the bridge was finished, the two villages held a single festival for the first time in a "
    "hundred years. They argued about the music, about the food, and about who should cut the ribbon. "
    "In the end a small girl cut it with her grandmother's sewing scissors, and everyone agreed that "
    "this had been the plan all along.",
    "Bees do not like to be hurried. A beekeeper learns to move as if the afternoon will never end, "
    "to breathe slowly, and to listen. The hive hums higher when it is unhappy. It is a sound you "
    "learn the way you learn a friend's footsteps on the stairs.",
    "The clock in the square ran seven minutes slow for as long as anyone could remember. Trains did "
    "not stop in the town, so nobody minded. When a young clockmaker finally set it right, people "
    "were late for everything for a month, and some asked her to put it back.",
    "老街的尽头有一家小书店。店主每天早上先给窗台上的花浇水，然后才开门。来买书的人不多，"
    "可是放学以后，总有几个孩子坐在角落里安静地看书，一直看到天黑。",
    "山里的冬天来得早。十月底，第一场雪就盖住了小路。村里的人把柴火堆在屋檐下，把萝卜和白菜"
    "放进地窖。夜里大家围着火炉讲故事，讲的都是很久以前的事。",
]


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def story(rng: random.Random) -> str:
    name, helper = rng.choice(NAMES), rng.choice(HELPERS)
    role, place, task = rng.choice(ROLES), rng.choice(PLACES), rng.choice(TASKS)
    obstacle, obj, animal = rng.choice(OBSTACLES), rng.choice(OBJECTS), rng.choice(ANIMALS)
    first = [
        f"{rng.choice(TIMES)}, {rng.choice(WEATHER)}. {name} was {with_article(role)} who lived in {place}.",
        f"{name}, the {role}, had lived in {place} for as long as anyone could remember.",
        f"There was once {with_article(role)} called {name} who lived in {place}.",
    ]
    middle = [
        f"That day {name} had to {task}, but {obstacle}.",
        f"{name} set out to {task}. On the way {name} met {animal} and {helper}.",
        f"{name} felt {rng.choice(FEELINGS)}, because {obstacle} and there was still work to do.",
        f"In a pocket {name} carried {obj}, which had belonged to an old {rng.choice(ROLES)}.",
    ]
    turn = [
        f"Then {helper} arrived with {obj} and showed {name} another way.",
        f"{name} thought for a long time, then laughed, because the answer had been there all along.",
        f"{animal.capitalize()} led {name} along a path nobody had used for years.",
        f"Together they waited until {rng.choice(WEATHER)}, and then they tried again.",
    ]
    sentences = [rng.choice(first)] + rng.sample(middle, 2) + [rng.choice(turn)]
    sentences.append(f"In the end {name} managed to {task}, {rng.choice(ENDINGS)}.")
    return " ".join(sentences)


def dialogue(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    obj, task = rng.choice(OBJECTS), rng.choice(TASKS)
    lines = [
        f'"Have you seen {obj}?" asked {a}.',
        f'"I think I left it by the door," said {b}. "Why do you need it?"',
        f'"I have to {task} before evening."',
        rng.choice([f'"Then I will come with you," said {b}.',
                    f'"You will never manage that alone," said {b}, smiling.',
                    f'"Wait until the rain stops," said {b}. "It will not take long."']),
        rng.choice([f"{a} nodded, and they went out together.", f"{a} sighed and put on a coat.",
                    f"{a} was already halfway down the road."]),
    ]
    return "\n".join(lines)


def letter(rng: random.Random) -> str:
    writer, reader = rng.sample(NAMES, 2)
    season = rng.choice(list(SEASONS))
    things = rng.sample(SEASONS[season], 2)
    return (f"Dear {reader},\n"
            f"It is {season} here, with {things[0]} and {things[1]}. "
            f"I have been {rng.choice(FEELINGS)} this week. The {rng.choice(ROLES)} next door asked "
            f"me to {rng.choice(TASKS)}, and I said yes before I had thought about it. "
            f"Please write soon and tell me how things are in {rng.choice(PLACES)}.\n"
            f"With love,\n{writer}")


def weather_note(rng: random.Random) -> str:
    season = rng.choice(list(SEASONS))
    things = rng.sample(SEASONS[season], 3)
    return (f"Notes for a {season} day. {rng.choice(TIMES)}, {rng.choice(WEATHER)}. "
            f"Everywhere there were {things[0]}, {things[1]} and {things[2]}. "
            f"By evening {rng.choice(WEATHER)}.")


def recipe(rng: random.Random) -> str:
    dish = rng.choice(list(DISHES))
    items = DISHES[dish]
    minutes = rng.choice([10, 15, 20, 30, 40, 45, 60])
    people = rng.choice(NUMBERS[2:7])
    return (f"How to make {dish} for {people} people. You need {items[0]}, {items[1]}, {items[2]} "
            f"and {items[3]}. First mix the {items[0]} with the {items[1]}. Then add the {items[2]} "
            f"and stir slowly. Cook it for {minutes} minutes, add the {items[3]} at the end, "
            f"and serve it while it is warm.")


def number_sentences(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 6)):
        x, y = rng.randint(0, 10), rng.randint(0, 10)
        if rng.random() < 0.5:
            sentences.append(f"{NUMBERS[x].capitalize()} plus {NUMBERS[y]} is {NUMBERS[x + y]}.")
        else:
            big, small = max(x, y), min(x, y)
            sentences.append(f"{NUMBERS[big].capitalize()} minus {NUMBERS[small]} is {NUMBERS[big - small]}.")
    return " ".join(sentences)


def zh_story(rng: random.Random) -> str:
    name, friend = rng.sample(ZH_NAMES, 2)
    place, thing = rng.choice(ZH_PLACES), rng.choice(ZH_THINGS)
    return (f"{rng.choice(ZH_TIMES)}，{rng.choice(ZH_WEATHER)}。{name}在{place}看见了{thing}。"
            f"{name}{rng.choice(ZH_FEELINGS)}，就去找{friend}。他们一起{rng.choice(ZH_ACTIONS)}，"
            f"又{rng.choice(ZH_ACTIONS)}。回家的时候，{rng.choice(ZH_WEATHER)}，两个人都{rng.choice(ZH_FEELINGS)}。")


def zh_note(rng: random.Random) -> str:
    x, y = rng.randint(1, 9), rng.randint(1, 9)
    digits = "零一二三四五六七八九十"
    total = x + y
    total_zh = digits[total] if total <= 10 else "十" + digits[total - 10]
    giver, taker = rng.sample(ZH_NAMES, 2)
    return (f"{taker}有{digits[x]}个苹果，{giver}又给了{digits[y]}个，"
            f"现在一共有{total_zh}个苹果。")


GENERATORS = [(story, 30), (dialogue, 12), (letter, 8), (weather_note, 8), (recipe, 6),
              (number_sentences, 6), (zh_story, 10), (zh_note, 5)]


def build_corpus(seed: int = SEED, target_bytes: int = TARGET_BYTES) -> str:
    rng = random.Random(seed)
    makers = [make for make, weight in GENERATORS for _ in range(weight)]
    pieces, num_bytes = list(HANDWRITTEN), sum(len(p.encode()) for p in HANDWRITTEN)
    while num_bytes < target_bytes:
        piece = rng.choice(makers)(rng)
        pieces.append(piece)
        num_bytes += len(piece.encode()) + 2
    rng.shuffle(pieces)
    return "\n\n".join(pieces) + "\n"


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "prose.txt"
    out.write_text(build_corpus(), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
