"""The text `minifd calibrate` runs through a model when no --text is given: a few paragraphs of plain
English in several registers (narrative, explanation, dialogue, lists, numbers), written for minifd."""

DEFAULT_TEXT = """\
The harbour town woke slowly that morning. Fog lay over the water like a grey blanket, and the
fishing boats rocked against their ropes while gulls argued on the roofs of the sheds. Mara pulled
her coat tighter, counted the crates one more time, and wondered whether the ferry would run at all.
Her brother had promised to meet her at eight, but the clock on the church tower already showed a
quarter past, and the road from the hills was still empty.

A computer keeps its most frequently used data close to the processor. Registers hold a handful of
values, a small cache holds recently touched memory, and the main memory holds everything else.
Reading from the main memory takes hundreds of cycles, so programs that walk through memory in order
run much faster than programs that jump around at random. This is why a careful programmer thinks
about the layout of data as much as about the steps of the algorithm.

"Do you think it will rain?" asked the old man at the bus stop.
"The forecast said sunshine in the afternoon," replied the student, looking up at the clouds.
"Forecasts," he laughed. "I have lived here seventy years. When the swallows fly low, it rains."
She smiled, opened her umbrella anyway, and offered him half of the shelter.

To bake a simple loaf of bread you need four things: flour, water, salt and yeast. Mix 500 grams of
flour with 350 millilitres of warm water, 10 grams of salt and 7 grams of dried yeast. Knead the
dough for ten minutes until it is smooth, leave it covered for an hour until it has doubled in size,
shape it, let it rise again for half an hour, and bake it at 220 degrees for about 35 minutes. The
loaf is done when it sounds hollow as you tap the bottom.

The history of writing begins with counting. Merchants in ancient cities pressed marks into clay to
record how many sheep or jars of oil had changed hands. Over centuries those marks became symbols for
words and then for sounds, and the same clay tablets that once listed grain began to carry laws,
letters, prayers and stories. Every alphabet in use today descends from a few such inventions.

In mathematics, a prime number is a whole number greater than one whose only divisors are one and
itself. The first few primes are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29. Euclid showed more than two
thousand years ago that there is no largest prime: if you multiply any finite list of primes together
and add one, the result has a prime factor that was not on the list.

The meeting was scheduled for Tuesday at ten, but three of the five members could not attend, so the
chair moved it to Thursday afternoon. The agenda had four items: the budget for next year, the repair
of the library roof, a proposal to extend the opening hours on weekends, and any other business.
Everyone agreed that the roof could not wait another winter.
"""
