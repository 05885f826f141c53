"""Build the built-in edit set from the fact table below and check it with a model.

    python -m kedit_core.data.builtin.make            # check with smollm2-135m and write
    python -m kedit_core.data.builtin.make --all      # keep facts the model does not know too

Each relation has a rewrite template, two paraphrase templates and true facts written by
us. A fact is kept when the model ranks its true answer's first token first after the
rewrite prompt (it "knows" it). Each edit's target_new is the true object of another
subject of the same relation (a counterfactual, as in CounterFact); its five neighbourhood
prompts are the rewrite template on five other known subjects of that relation, with their
true answers (CounterFact's neighbourhood construction, Meng et al. 2202.05262 section 3).
Deviation: the neighbours come from a held-out pool of NEIGHBOUR_POOL subjects per relation
that the set never edits, so locality over a whole-set stream is not confounded by the
stream's own edits (in the full CounterFact such overlaps are rare; in a set of ~100 they
were all of them).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# relation id: (rewrite template, (paraphrase templates), [(subject, true object), ...])
RELATIONS: dict[str, tuple[str, tuple[str, str], list[tuple[str, str]]]] = {
    # Templates chosen by measurement on smollm2-135m (the share of facts whose true answer
    # it ranks first): "The capital of {} is the city of" 27/32 vs "The capital of {} is"
    # 23/32; "{} is located in the country of" 27/48 vs "{} is the capital of" 19/48.
    "capital": ("The capital of {} is the city of", ("{}'s capital city is", "The capital city of {} is"), [
        ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
        ("Spain", "Madrid"), ("Russia", "Moscow"), ("England", "London"), ("China", "Beijing"),
        ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
        ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
        ("Canada", "Ottawa"), ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
        ("Cuba", "Havana"), ("Hungary", "Budapest"), ("Denmark", "Copenhagen"),
        ("Finland", "Helsinki"), ("Belgium", "Brussels"), ("South Korea", "Seoul"),
        ("Argentina", "Buenos Aires"), ("Turkey", "Ankara"), ("Australia", "Canberra"),
        ("Iran", "Tehran"), ("Scotland", "Edinburgh"), ("Chile", "Santiago"),
        ("Switzerland", "Bern"), ("the Czech Republic", "Prague"), ("Romania", "Bucharest"),
        ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Colombia", "Bogota"),
        ("Venezuela", "Caracas"), ("Saudi Arabia", "Riyadh"), ("Iraq", "Baghdad"),
        ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Nepal", "Kathmandu"), ("Vietnam", "Hanoi"),
        ("Morocco", "Rabat"), ("Ghana", "Accra"), ("Iceland", "Reykjavik"), ("Wales", "Cardiff"),
        ("Mexico", "Mexico City"), ("Ukraine", "Kyiv"), ("Pakistan", "Islamabad"),
        ("New Zealand", "Wellington"), ("the Netherlands", "Amsterdam"), ("India", "New Delhi"),
        ("Brazil", "Brasilia"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
        ("Ethiopia", "Addis Ababa"), ("Afghanistan", "Kabul"), ("Malaysia", "Kuala Lumpur"),
        ("Bangladesh", "Dhaka"), ("Uruguay", "Montevideo"), ("Ecuador", "Quito"), ("Tunisia", "Tunis"),
        ("Libya", "Tripoli"), ("Sudan", "Khartoum"), ("Uganda", "Kampala"), ("Jordan", "Amman"),
        ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Slovakia", "Bratislava"),
        ("Senegal", "Dakar"), ("North Korea", "Pyongyang"), ("Taiwan", "Taipei"), ("Qatar", "Doha"),
    ]),
    "landmark_city": ("{} is located in the city of", ("{} stands in the city of", "You can visit {} in the city of"), [
        ("The Eiffel Tower", "Paris"), ("The Colosseum", "Rome"), ("Big Ben", "London"),
        ("The Statue of Liberty", "New York"), ("The Brandenburg Gate", "Berlin"),
        ("The Sagrada Familia", "Barcelona"), ("The Kremlin", "Moscow"),
        ("The Golden Gate Bridge", "San Francisco"), ("The Sydney Opera House", "Sydney"),
        ("The Taj Mahal", "Agra"), ("The Acropolis", "Athens"), ("The Space Needle", "Seattle"),
        ("The Louvre", "Paris"), ("Buckingham Palace", "London"), ("The Forbidden City", "Beijing"),
        ("Tokyo Tower", "Tokyo"), ("The Vatican", "Rome"), ("The White House", "Washington"),
        ("The Empire State Building", "New York"), ("The Leaning Tower of Pisa", "Pisa"),
        ("The Parthenon", "Athens"), ("The Tower of London", "London"), ("Times Square", "New York"),
        ("The Hagia Sophia", "Istanbul"), ("The Alamo", "San Antonio"), ("Westminster Abbey", "London"),
        ("Notre-Dame Cathedral", "Paris"), ("The Trevi Fountain", "Rome"), ("The Pantheon", "Rome"),
        ("The Arc de Triomphe", "Paris"), ("Red Square", "Moscow"), ("The CN Tower", "Toronto"),
        ("The Burj Khalifa", "Dubai"), ("Central Park", "New York"), ("The Rialto Bridge", "Venice"),
        ("The Prado Museum", "Madrid"), ("The Alhambra", "Granada"), ("Wall Street", "New York"),
        ("The Willis Tower", "Chicago"), ("The Gateway Arch", "St. Louis"),
        ("The Atomium", "Brussels"), ("The Blue Mosque", "Istanbul"), ("The Hollywood Sign", "Los Angeles"),
        ("Christ the Redeemer", "Rio de Janeiro"), ("The Reichstag", "Berlin"),
        ("The Uffizi Gallery", "Florence"), ("St. Peter's Basilica", "Rome"), ("The Charles Bridge", "Prague"),
        ("The Hermitage Museum", "Saint Petersburg"), ("The Little Mermaid statue", "Copenhagen"),
        ("The Smithsonian", "Washington"), ("Trafalgar Square", "London"), ("The Bund", "Shanghai"),
    ]),
    "city_country": ("{} is located in the country of", ("{} is a city in", "The city of {} lies in"), [
        ("Paris", "France"), ("Tokyo", "Japan"), ("Rome", "Italy"), ("Berlin", "Germany"),
        ("Madrid", "Spain"), ("Moscow", "Russia"), ("London", "England"), ("Beijing", "China"),
        ("Cairo", "Egypt"), ("Athens", "Greece"), ("Lisbon", "Portugal"), ("Vienna", "Austria"),
        ("Dublin", "Ireland"), ("Oslo", "Norway"), ("Stockholm", "Sweden"), ("Warsaw", "Poland"),
        ("Ottawa", "Canada"), ("Bangkok", "Thailand"), ("Nairobi", "Kenya"), ("Havana", "Cuba"),
        ("Budapest", "Hungary"), ("Copenhagen", "Denmark"), ("Toronto", "Canada"),
        ("Sydney", "Australia"), ("Mumbai", "India"), ("Barcelona", "Spain"), ("Munich", "Germany"),
        ("Milan", "Italy"), ("Osaka", "Japan"), ("Shanghai", "China"), ("Istanbul", "Turkey"),
        ("Brussels", "Belgium"), ("Lagos", "Nigeria"), ("Manchester", "England"), ("Venice", "Italy"),
        ("Kyoto", "Japan"), ("Marseille", "France"), ("Hamburg", "Germany"), ("Melbourne", "Australia"),
        ("Vancouver", "Canada"), ("Delhi", "India"), ("Lyon", "France"), ("Naples", "Italy"),
        ("Seville", "Spain"), ("Florence", "Italy"), ("Krakow", "Poland"), ("Porto", "Portugal"),
        ("Montreal", "Canada"), ("Kolkata", "India"), ("Alexandria", "Egypt"),
        ("Frankfurt", "Germany"), ("Geneva", "Switzerland"), ("Zurich", "Switzerland"),
        ("Amsterdam", "the Netherlands"), ("Rio de Janeiro", "Brazil"), ("Sao Paulo", "Brazil"),
        ("Buenos Aires", "Argentina"), ("Seoul", "South Korea"), ("Hanoi", "Vietnam"),
        ("Tehran", "Iran"), ("Karachi", "Pakistan"), ("Chicago", "the United States"),
        ("Los Angeles", "the United States"), ("Bogota", "Colombia"), ("Lima", "Peru"),
    ]),
    "language": ("The official language of {} is", ("People in {} speak", "In {}, most people speak"), [
        ("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
        ("Japan", "Japanese"), ("Russia", "Russian"), ("China", "Chinese"), ("Brazil", "Portuguese"),
        ("Portugal", "Portuguese"), ("Mexico", "Spanish"), ("Greece", "Greek"),
        ("the Netherlands", "Dutch"), ("Poland", "Polish"), ("Sweden", "Swedish"),
        ("Turkey", "Turkish"), ("Egypt", "Arabic"), ("South Korea", "Korean"), ("Israel", "Hebrew"),
        ("Finland", "Finnish"), ("Hungary", "Hungarian"), ("Argentina", "Spanish"),
        ("Norway", "Norwegian"), ("Denmark", "Danish"), ("Iran", "Persian"), ("Vietnam", "Vietnamese"),
        ("Colombia", "Spanish"), ("Austria", "German"), ("Peru", "Spanish"), ("Saudi Arabia", "Arabic"),
        ("Ukraine", "Ukrainian"), ("Thailand", "Thai"), ("Indonesia", "Indonesian"), ("Chile", "Spanish"),
        ("Cuba", "Spanish"), ("Romania", "Romanian"), ("the Czech Republic", "Czech"),
        ("Iceland", "Icelandic"), ("Bulgaria", "Bulgarian"), ("Serbia", "Serbian"),
        ("Croatia", "Croatian"), ("Pakistan", "Urdu"), ("Bangladesh", "Bengali"), ("Malaysia", "Malay"),
        ("England", "English"), ("Australia", "English"), ("Venezuela", "Spanish"),
    ]),
    "continent": ("{} is located in the continent of", ("{} is part of the continent of", "Geographically, {} belongs to the continent of"), [
        ("Kenya", "Africa"), ("France", "Europe"), ("Japan", "Asia"), ("Nigeria", "Africa"),
        ("Germany", "Europe"), ("China", "Asia"), ("Egypt", "Africa"), ("India", "Asia"),
        ("Italy", "Europe"), ("Ghana", "Africa"), ("Thailand", "Asia"), ("Poland", "Europe"),
        ("Vietnam", "Asia"), ("Ethiopia", "Africa"), ("Spain", "Europe"), ("Mongolia", "Asia"),
        ("Uganda", "Africa"), ("Norway", "Europe"), ("Tanzania", "Africa"), ("Sweden", "Europe"),
        ("Brazil", "South America"), ("Argentina", "South America"), ("Peru", "South America"),
        ("Chile", "South America"), ("Colombia", "South America"), ("Canada", "North America"),
        ("Mexico", "North America"), ("Morocco", "Africa"), ("Greece", "Europe"), ("Indonesia", "Asia"),
        ("Austria", "Europe"), ("Pakistan", "Asia"), ("Zambia", "Africa"), ("Nepal", "Asia"),
    ]),
    "maker": ("{} is a product made by", ("{} was developed by the company", "The company behind {} is"), [
        ("The iPhone", "Apple"), ("Windows", "Microsoft"), ("The PlayStation", "Sony"),
        ("Android", "Google"), ("The Xbox", "Microsoft"), ("The Galaxy S", "Samsung"),
        ("The MacBook", "Apple"), ("The Model S", "Tesla"), ("Photoshop", "Adobe"),
        ("The ThinkPad", "Lenovo"), ("The iPad", "Apple"), ("The Switch", "Nintendo"),
    ]),
}


# Subjects per relation that appear only in neighbourhood prompts and are never edited, so
# that a stream over the whole set measures damage to facts nobody asked to change (with
# neighbours drawn from edited subjects, a later edit of a neighbour's subject counts as a
# locality failure of an earlier one). Distinct objects, so >= 5 remain for any target.
NEIGHBOUR_POOL = 6


def _split(rel: str, facts: list[tuple[str, str]], rng: random.Random):
    """(edited facts, neighbour pool) of one relation."""
    order = list(facts)
    rng.shuffle(order)
    pool, objs = [], set()
    for s, o in order:
        if len(pool) < NEIGHBOUR_POOL and o not in objs and s != "The Eiffel Tower":
            pool.append((s, o))
            objs.add(o)
    return [f for f in facts if f not in pool], pool


def build(known: set[tuple[str, str]] | None = None, seed: int = 0) -> list[dict]:
    """The edits of the fact table in CounterFact (ROME) record format; `known` holds the
    (subject, relation) pairs to keep (all when None)."""
    rng = random.Random(seed)
    out = []
    for rel, (template, paras, facts) in RELATIONS.items():
        objects = sorted({o for _, o in facts})
        kept = [f for f in facts if known is None or (f[0], rel) in known]
        edited, pool = _split(rel, kept, rng)
        if len(pool) < NEIGHBOUR_POOL:
            continue
        for subject, true in edited:
            i = facts.index((subject, true))
            choices = [o for o in objects if o != true]
            new = "Rome" if subject == "The Eiffel Tower" else rng.choice(choices)
            nb = [(s, o) for s, o in pool if o != new]
            rng.shuffle(nb)
            out.append({
                "case_id": f"{rel}-{i:02d}",
                "requested_rewrite": {"prompt": template, "subject": subject, "relation_id": rel,
                                      "target_new": {"str": new}, "target_true": {"str": true}},
                "paraphrase_prompts": [p.replace("{}", subject) for p in paras],
                "neighborhood_prompts": [template.replace("{}", s) for s, _ in nb[:5]],
                "neighborhood_answers": [o for _, o in nb[:5]],
                "attribute_prompts": [], "generation_prompts": [
                    template.replace("{}", subject), paras[0].replace("{}", subject)],
            })
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--all", action="store_true", help="keep facts the model does not know too")
    ap.add_argument("--out", default=str(Path(__file__).with_name("counterfacts.jsonl")))
    args = ap.parse_args(argv)
    from kedit_core.generation import first_token_ranks
    from kedit_core.models import load

    facts = [(rel, t, s, o) for rel, (t, _, fs) in RELATIONS.items() for s, o in fs]
    known = None
    if not args.all:
        lm = load(args.model, device="cpu")
        ranks = first_token_ranks(lm, [t.replace("{}", s) for _, t, s, _ in facts], [o for *_, o in facts])
        known = {(s, rel) for (rel, _, s, _), k in zip(facts, ranks) if k == 0}
        print(f"{len(known)}/{len(facts)} true answers ranked first by {args.model}")
    kept = build(known)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in kept))
    print(f"wrote {len(kept)} edits to {args.out}")


if __name__ == "__main__":
    main()
