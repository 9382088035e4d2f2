// A small English corpus the synthetic BPE vocabulary is trained on: image-caption style
// prose (what CapRL produces) plus chat boilerplate, so that prompts such as
// "Please describe this image in detail" and the system prompt tokenize to a few tokens.
// Changing this text changes every generated vocabulary (and so every model file).

export const BPE_TRAINING_CORPUS = `
Please describe this image in detail. Please describe this image in detail.
Please describe this image in detail, including the objects, colors, people, text and background.
Describe this image. Describe the image in detail. Describe the picture in detail. Describe what you see.
What is in this image? What is shown in the picture? What is happening in this photo? What color is the car?
Please describe the photo. Please write a detailed caption for this image. Please provide a short caption.
Write a caption for the image. Give a detailed description of the scene. Summarize the image in one sentence.
You are a helpful assistant. You are a helpful assistant. You are a helpful assistant that describes images.
system
user
assistant
system
user
assistant
system
user
assistant
The image shows a small white dog sitting on a green lawn in front of a red brick house.
The image shows a busy city street at night, with cars, buses and people walking on the sidewalk.
The image shows a wooden table with a cup of coffee, a laptop, a notebook and a pen on it.
The image shows a young woman wearing a blue dress and holding a yellow umbrella in the rain.
The image shows a group of people standing in a park, smiling and looking at the camera.
The image shows a bowl of fresh fruit, including apples, oranges, bananas and grapes.
The image shows a mountain landscape with snow on the peaks, a blue sky and white clouds.
The image shows a black cat lying on a gray sofa next to a window with white curtains.
The image shows a kitchen with white cabinets, a stainless steel refrigerator and a large window.
The image shows a red car parked on the side of the road near a tall green tree.
The image shows a beach at sunset, with waves, sand, palm trees and an orange sky.
The image shows a man riding a bicycle on a road through a forest in the morning.
The image shows a plate of food with rice, vegetables and a piece of grilled chicken.
The image shows a street sign with white text on a blue background.
The image shows a child playing with a ball in the yard while a dog watches.
The image shows an old building with large windows, stone walls and a clock tower.
The image shows a chart with several bars, a title at the top and labels on the left side.
The image shows a screenshot of a web page with a menu, a search bar and several buttons.
The image shows a close-up of a flower with pink petals and a yellow center.
The image shows two people sitting at a table in a restaurant, talking and drinking wine.
In the foreground, there is a large rock. In the background, there are trees and a lake.
In the center of the image, there is a woman holding a phone. On the left, there is a man.
On the right side of the image, there is a tall building. At the bottom, there is a road.
At the top of the image, the sky is clear and blue. The light comes from the left.
The photo was taken outdoors during the day. The photo was taken indoors at night.
The picture shows a quiet room with a bed, a lamp and a bookshelf full of books.
The picture shows a field of green grass with a few cows and a wooden fence.
The picture shows a train at a station, with passengers waiting on the platform.
The scene is bright and colorful. The scene is dark and quiet. The scene looks calm.
The overall atmosphere of the image is warm and peaceful.
The colors in the image are mostly blue, green and white, with some red and yellow details.
There is a person standing near the door. There are two dogs running on the grass.
There is some text written on the wall. The text reads "Welcome" in large black letters.
This image is a photograph of a landscape. This image is a drawing of a house.
This image appears to be a painting of a river with boats and small houses.
It is a sunny day. It is raining. It is snowing. It looks like early morning.
The man is wearing a black jacket, blue jeans and white shoes.
The woman is wearing a red shirt and has long brown hair.
The dog is brown and white, with a long tail and short legs.
The cat is sleeping. The bird is flying. The horse is standing in the field.
The table is made of wood. The wall is painted white. The floor is covered with a carpet.
The car is red. The bus is yellow. The sky is blue. The grass is green. The sun is bright.
Several people are walking along the street, and some of them are carrying bags.
A large tree stands in the middle of the field, and its leaves are green and yellow.
A small boat is floating on the calm water of the lake near the shore.
A plate with a slice of cake and a fork is placed on the white table.
A laptop computer is open on the desk, showing a document on the screen.
A man and a woman are walking together on the beach, holding hands.
In summary, the image depicts a peaceful scene in nature with mountains, trees and a lake.
In summary, the image shows a busy urban environment with many people and vehicles.
The image is a detailed illustration with many small objects, shapes and colors.
The lighting is soft and natural, and the shadows are long.
The image contains a logo, a title and a short paragraph of text.
The person in the image is looking directly at the camera and smiling.
The background is blurred, which makes the main subject stand out.
The image has a high resolution, and the details are sharp and clear.
Overall, this is a simple image with a clear subject and a clean background.
Thank you. Sure! Here is a detailed description of the image. Certainly. Of course.
I can see a dog, a cat, a bird, a tree, a house, a car, a road, a river, a bridge and a city.
The numbers 1, 2, 3, 10, 20, 100 and 2024 appear in the image.
Question: What is the main object in the image? Answer: The main object is a red apple.
Question: How many people are in the picture? Answer: There are three people in the picture.
`;
